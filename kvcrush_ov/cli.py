"""`kvcrush-ov` command line: prepare, generate, bench, serve, eval, demo.

Errors of ours print one line (`error: ...`) and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.config import KV_PRECISIONS
from .core.errors import KVCrushError
from .core.options import parse_options, parse_qualified_options


def _model_dir(arg: str) -> Path:
    from .tools.models import resolve_model_dir
    return resolve_model_dir(arg)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise KVCrushError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _eviction_config(args: argparse.Namespace, policy: str | None = None, budget: int | None = None):
    from .core.eviction_config import CacheEvictionConfig
    policy = policy or getattr(args, "policy", None)
    if policy in (None, "full"):
        return None
    options = parse_options(getattr(args, "policy_option", None) or [])
    return CacheEvictionConfig(policy, budget=budget or args.budget, options=options, prefill=args.prefill,
                               prefill_chunk=args.prefill_chunk, decode_slack=getattr(args, "decode_slack", 0))


def _add_prefill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", choices=["auto", "after", "chunked"], default="auto",
                   help="when the prompt is evicted. auto (default): after the whole prompt when the KV pool can "
                        "hold it, memory-bounded only when it cannot; after: always after the whole prompt; "
                        "chunked: always compact during prefill (memory bounded, decides before the question)")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="memory-bounded prefill: prompt tokens cached between compactions (0 = the budget)")
    p.add_argument("--decode-slack", type=int, default=0,
                   help="decoding evicts once a sequence holds one block + this many tokens (whole blocks) past "
                        "its budget (0: every block)")


def _scheduler_config(args: argparse.Namespace, eviction=None):
    from .core.config import SchedulerConfig
    return SchedulerConfig(cache_size=args.cache_size, num_kv_blocks=args.num_kv_blocks,
                           max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                           kv_cache_precision=args.kv_precision,
                           cache_eviction_config=eviction if eviction is not None else _eviction_config(args))


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="IR directory or a known name (default: smollm2-135m)")
    p.add_argument("--device", default="CPU")
    p.add_argument("--cache-size", type=float, default=1.0, help="KV pool size in GB (default 1)")
    p.add_argument("--num-kv-blocks", type=int, default=0, help="KV pool size in blocks (overrides --cache-size)")
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-precision", choices=KV_PRECISIONS, default=None,
                   help="KV cache precision (default: the device's)")


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="full",
                   help="full | streaming | h2o | snapkv | pyramidkv | kvcrush | kvcrush-block")
    p.add_argument("--budget", type=int, default=512,
                   help="KV tokens kept per sequence per layer, sinks/recent/representatives included")
    p.add_argument("--policy-option", action="append", metavar="KEY=VALUE",
                   help="a policy option, e.g. window=8, representative_fraction=0.25, anchors=mean (repeatable)")
    _add_prefill_args(p)
    p.add_argument("--backend", choices=["ours", "native"], default="ours",
                   help="our engine, or openvino_genai's own pipeline and eviction")


def cmd_prepare(args: argparse.Namespace) -> None:
    from .tools import models
    if args.gguf:
        if args.name:
            raise KVCrushError("give a model name or --gguf FILE, not both (--name NAME names a --gguf build)")
        print(models.prepare_gguf(args.gguf, args.model_name, weight_format=args.weight_format, force=args.force))
        return
    if not args.name:
        raise KVCrushError("give a model name (e.g. smollm2-135m, qwen2.5-coder-0.5b) or --gguf FILE")
    if args.model_name:
        raise KVCrushError("--name names a --gguf build; a known model keeps its own name")
    print(models.prepare(args.name, weight_format=args.weight_format, force=args.force))


def cmd_generate(args: argparse.Namespace) -> None:
    from .api.pipeline import LLMPipeline
    prompt = Path(args.prompt_file).read_text(encoding="utf-8", errors="strict") if args.prompt_file else args.prompt
    if prompt is None:
        raise KVCrushError("give a prompt: --prompt TEXT or --prompt-file FILE")
    pipe = LLMPipeline(_model_dir(args.model), args.device, scheduler_config=_scheduler_config(args),
                       backend=args.backend)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = pipe.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                           temperature=args.temperature or 1.0, rng_seed=args.seed,
                           apply_chat_template=not args.no_chat_template,
                           streamer=stream if args.backend == "ours" else None)
    if args.backend == "native":
        sys.stdout.write(result.texts[0])
    sys.stdout.write("\n")
    if pipe.engine is not None:
        n = result.prompt_lengths[0]
        print(f"[{n} prompt tokens, {len(result.token_ids[0])} new tokens, policy {args.policy}, eviction path "
              f"{result.eviction_modes[0]}, KV {result.kv_bytes[0] / 2**20:.2f} MiB while decoding, peak "
              f"{result.peak_kv_bytes[0] / 2**20:.2f} MiB]", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> None:
    if args.capacity:
        import shlex

        from .tools.capacity import CapacityConfig, run_capacity
        eviction = _eviction_config(args)
        if eviction is None:
            raise KVCrushError("--capacity compares the full cache with a policy: give --policy (e.g. kvcrush)")
        run_capacity(CapacityConfig(
            _model_dir(args.model), _scheduler_config(args), eviction, device=args.device, requests=args.requests,
            prompt_tokens=_ints(args.prompt_tokens, "--prompt-tokens")[0],
            new_tokens=_ints(args.new_tokens, "--new-tokens")[0],
            arrivals=tuple(p for p in args.arrivals.split(",") if p), arrival_rate=args.arrival_rate, seed=args.seed,
            out=Path(args.out), command="kvcrush-ov " + " ".join(shlex.quote(a) for a in sys.argv[1:])))
        return
    from .tools.bench import BenchConfig, run_bench
    run_bench(BenchConfig(_model_dir(args.model), _scheduler_config(args), device=args.device, backend=args.backend,
                          prompt_tokens=_ints(args.prompt_tokens, "--prompt-tokens"),
                          concurrency=_ints(args.concurrency, "--concurrency"),
                          new_tokens=_ints(args.new_tokens, "--new-tokens"), repeats=args.repeats, out=Path(args.out)))


def cmd_serve(args: argparse.Namespace) -> None:
    from .api.serve.launch import run_serve, served_name
    model_dir = _model_dir(args.model)
    run_serve(model_dir, _scheduler_config(args), served_name(args.model, model_dir, args.served_model_name),
              device=args.device, host=args.host, port=args.port, log_level=args.log_level, ray=args.ray,
              replicas=args.replicas, ray_num_cpus=args.ray_num_cpus)


def cmd_eval(args: argparse.Namespace) -> None:
    import shlex

    from .tools.eval.runner import EvalConfig, run_eval
    from .tools.eval.suite import load_suite
    from .api.pipeline import Tokenizer

    model_dir = _model_dir(args.model)
    options = parse_qualified_options(args.policy_option or [])
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b]
    except ValueError:
        raise KVCrushError(f"--budgets takes comma-separated numbers, got {args.budgets!r}") from None
    if args.budget_bytes:
        try:
            budgets = [float(b) for b in args.budget_bytes.split(",") if b]
        except ValueError:
            raise KVCrushError(f"--budget-bytes takes comma-separated numbers, got {args.budget_bytes!r}") from None
    properties = {"INFERENCE_PRECISION_HINT": args.inference_precision} if args.inference_precision else None
    config = EvalConfig(policies=[p for p in args.policies.split(",") if p], budgets=budgets, device=args.device,
                        cache_size=args.cache_size, num_kv_blocks=args.num_kv_blocks,
                        policy_options=options or None, seed=args.seed,
                        budget_bytes=bool(args.budget_bytes), properties=properties, reference=args.reference or None)
    precisions = [p or None for p in args.kv_precisions.split(",")] if args.kv_precisions else None
    tok = Tokenizer(model_dir)
    kwargs = {}
    if args.suite in ("ruler-mini", "real-text"):
        kwargs = {"lengths": tuple(int(n) for n in args.lengths.split(",")), "samples_per_task": args.samples_per_task,
                  "seed": args.seed}
        if args.suite == "real-text":
            kwargs["split"] = args.split
        if args.tasks:
            kwargs["tasks"] = args.tasks.split(",")
    samples = load_suite(args.suite, lambda text: len(tok.encode(text, add_special_tokens=False)), **kwargs)
    if args.limit:
        samples = samples[: args.limit]
    meta = {"suite": args.suite + (f" ({args.split} split)" if args.suite == "real-text" else ""), "command": "kvcrush-ov " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "seed": args.seed}
    result = run_eval(model_dir, samples, config, Path(args.out), meta, kv_precisions=precisions)
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {Path(args.out) / 'results.json'}, report.md, plot.png ({len(result['samples'])} rows)")


def cmd_demo(args: argparse.Namespace) -> None:
    from .tools.demo import run_demo
    run_demo(_model_dir(args.model), args.device, _scheduler_config(args), budget_fraction=args.budget_fraction,
             readme=Path(args.readme) if args.readme else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcrush-ov", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build OpenVINO IR of a known model; prints its directory last")
    p.add_argument("name", nargs="?", help="smollm2-135m | gemma3-270m | qwen2.5-coder-0.5b | qwen2.5-coder-1.5b | "
                                          "tiny-llama | tiny-<arch> (kvcrush_ov.tools.models.MODELS)")
    p.add_argument("--gguf", metavar="FILE", help="any GGUF transformers loads (llama, qwen2, gemma3, ...) instead of a name")
    p.add_argument("--name", dest="model_name", metavar="NAME",
                   help="cache name of the --gguf build (default: from the file name)")
    p.add_argument("--weight-format", default="fp16", help="fp16 | int8 | int4 (NNCF, as optimum-cli)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("generate", help="generate text for one prompt (streamed)")
    _add_engine_args(p)
    p.add_argument("--prompt")
    p.add_argument("--prompt-file")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true")
    _add_policy_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="throughput/latency benchmark; prints a table and writes JSON")
    _add_engine_args(p)
    p.add_argument("--backend", choices=["ours", "native", "compare"], default="ours")
    p.add_argument("--prompt-tokens", default="1024", help="comma-separated prompt lengths")
    p.add_argument("--concurrency", default="8", help="comma-separated numbers of concurrent requests")
    p.add_argument("--new-tokens", default="128", help="comma-separated numbers of new tokens")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats per configuration")
    p.add_argument("--policy", default="full", help="eviction policy for both backends (native: snapkv, h2o, kvcrush-block)")
    p.add_argument("--budget", type=int, default=512, help="KV tokens kept per sequence per layer")
    p.add_argument("--policy-option", action="append", metavar="KEY=VALUE")
    _add_prefill_args(p)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--capacity", action="store_true",
                   help="capacity of one fixed pool (--num-kv-blocks): full cache vs --policy on one request stream")
    p.add_argument("--requests", type=int, default=24, help="requests in the capacity stream")
    p.add_argument("--arrivals", default="all,poisson", help="capacity arrival patterns: all (at once), poisson")
    p.add_argument("--arrival-rate", type=float, default=0.5, help="Poisson arrivals, requests per second")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /metrics)")
    _add_engine_args(p)
    _add_policy_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="", help="the model id clients send (default: --model)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--ray", action="store_true", help="run as Ray Serve replicas behind one endpoint")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    p.add_argument("--ray-num-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (with --ray)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="score policies x budgets on a suite, side by side with openvino-genai's eviction")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="CPU")
    p.add_argument("--cache-size", type=float, default=1.0)
    p.add_argument("--num-kv-blocks", type=int, default=0,
                   help="KV pool in blocks (overrides --cache-size); prompts the pool cannot hold run memory-bounded")
    p.add_argument("--suite", default="ruler-mini", help="ruler-mini, real-text or a .jsonl file")
    p.add_argument("--split", choices=["tuning", "reporting"], default="reporting",
                   help="real-text: which half of the source texts (tune on one, report on the other)")
    p.add_argument("--reference", default="",
                   help="a policy of --policies: every row gets paired differences to it (bootstrap 95%% CI)")
    p.add_argument("--policies", default="full,streaming,h2o,snapkv,pyramidkv,kvcrush,kvcrush-block,native-snapkv,native-kvcrush")
    p.add_argument("--budgets", default="0.125,0.25,0.5", help="below 1: fraction of each prompt; from 1: tokens")
    p.add_argument("--lengths", default="1024,2048", help="ruler-mini prompt lengths in tokens")
    p.add_argument("--samples-per-task", type=int, default=3)
    p.add_argument("--tasks", default="", help="suite tasks (default: all)")
    p.add_argument("--limit", type=int, default=0, help="first N samples only")
    p.add_argument("--policy-option", action="append", metavar="POLICY.KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-precisions", default="", help="e.g. bf16,u8: run the grid per KV precision")
    p.add_argument("--budget-bytes", default="", help="budgets as KV bytes per sequence (overrides --budgets)")
    p.add_argument("--inference-precision", default="", help="INFERENCE_PRECISION_HINT, e.g. f32 (f16 KV needs f16/f32)")
    p.add_argument("--out", default="eval-out")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="prepare the default model; answer a long prompt with the full cache and KVCrush")
    _add_engine_args(p)
    p.add_argument("--budget-fraction", type=float, default=0.25, help="KVCrush budget as a fraction of the prompt")
    p.add_argument("--readme", default="", help="also write the table between this markdown file's demo markers")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KVCrushError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, UnicodeDecodeError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
