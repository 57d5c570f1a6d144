"""The ground every process stands on: settings, metrics, PII masking, the embedding model, the model
catalogue, the grounding prompt and logging. Imports only :mod:`schemas`."""
