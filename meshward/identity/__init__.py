"""The identity service (issue 3): Certify after TokenReview, signing SPIFFE leaf certificates.

Nothing is implemented here yet; this package only reserves the name.
"""
