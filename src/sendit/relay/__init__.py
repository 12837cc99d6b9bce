"""The Django app that moves data between the functional core and the database."""
