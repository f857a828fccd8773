"""The model process: loads one model by its Plan, batches requests, streams tokens over HTTP."""
