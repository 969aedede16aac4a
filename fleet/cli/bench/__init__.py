"""`fleet bench`: fleet's overhead against bare Celery and `docker run`, on
a private Redis."""
