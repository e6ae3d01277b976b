"""Store-and-forward: the SQLite file (`store`) and the one thread that writes it
(`writer`), its loop side with group commit, bounds and acks (`outbox`), draining
it into the next hop (`uplink`), and `fogwhisk outbox` (`cli`).

Knows nothing of pipelines, actions or vision: it carries `agent.messages.Outgoing`.
"""
