"""The continuous-batching engine: requests in, tokens out, over OpenVINO's PagedAttention."""
