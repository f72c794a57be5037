"""The sidecar proxy (issue 4): workload identity, mTLS both ways, inbound authorization.

Nothing is implemented here yet; this package only reserves the name.
"""
