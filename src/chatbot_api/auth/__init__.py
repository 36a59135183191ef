"""API keys as the identity: principals, hashed keys with scopes and expiry, the bearer
dependency every API route depends on, the admin key endpoints and the `keys` commands."""
