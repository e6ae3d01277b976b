"""Over-the-air model updates: signed releases (`release`), artifacts (`artifact`),
the operator CLI `fogwhisk model ...` (`cli`), transfer, and the device controller.

Nothing but agent.app (and the operator CLI in agent.__main__) imports this package
(an import-linter contract).
"""
