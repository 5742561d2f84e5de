"""Which weights get a mask and how sparse each is: the selection, the distributions (uniform, ER, ERK)."""
