"""The core: what runs a request and decides what stays in its KV cache.

engine/ (scheduler, block manager, model runner, sampler, evictor), policies/ (pure numpy keep-set
choices), transforms/ (OpenVINO graph passes), and the configs and errors they take. The core imports
nothing of api/ or tools/.
"""
