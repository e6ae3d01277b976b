"""Operator commands of `fogwhisk` that run beside the agent, not in it:
`status` (a device's retained status and telemetry) and `demo` (a self-contained
tour). `fogwhisk outbox` lives with the store it reads (`agent.delivery.cli`).
"""
