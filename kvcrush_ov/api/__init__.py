"""The doors users come through: LLMPipeline and ContinuousBatchingPipeline (openvino_genai's shapes),
the engine loop and its request handles, the openvino_genai backend, and the OpenAI-compatible server.
It builds on core/ and imports nothing of tools/.
"""
