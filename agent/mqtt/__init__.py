"""MQTT on asyncio: the codec (`codec`), broker connections (`connection`), topic
names and filters (`topics`).

Knows nothing of pipelines, actions, delivery or vision (an import-linter contract).
"""
