"""The HTTP service: FastAPI app, request batcher and web page; knows nothing of diffusion."""
