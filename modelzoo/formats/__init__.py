"""Other toolkits' checkpoint formats, read into (and written from) ``modelzoo.ldm.LatentDiffusion``."""
