"""The Django project: settings and URLs of Sendit's shell."""
