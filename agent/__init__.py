"""fogwhisk: an MQTT edge agent with durable store-and-forward and TFLite pipelines."""

__version__ = "0.1.0"
