"""Ops tooling around lingbot: what prepares and drives other machines. It imports `lingbot`; nothing in
`lingbot/` imports it, and it is not part of the installed package."""
