"""The worker process itself.

lifecycle.py   start-up fitness checks, SIGTERM, jobs left unstarted at shutdown
logs.py        logging with secrets redacted
lifetime.py    child processes that die with their parent
"""
