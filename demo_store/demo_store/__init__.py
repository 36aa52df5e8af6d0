"""The flyfn demo store: a Django project whose PDF receipts run on serverless Fly Machines."""
