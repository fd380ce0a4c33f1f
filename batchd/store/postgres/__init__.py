"""The PostgreSQL store: connections (`connection.py`) and its schema (`migrations.py`)."""
