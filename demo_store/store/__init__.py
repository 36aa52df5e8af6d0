"""The store app: products, purchases, and their PDF receipts."""
