"""A faithful local emulator of the Message Batches API."""
