"""`manage.py flyfn` lives here."""
