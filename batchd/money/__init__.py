"""Money: prices (pricing), what was spent (spending), and the limit on what may be (budget)."""
