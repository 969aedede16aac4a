"""Celery and kombu: where a task goes (`routing`, pure), the Celery app
(`celery_app`), publishing (`publish`), reading kombu's queues in Redis
(`queues`) and the messages of fleet's control channel (`control`)."""
