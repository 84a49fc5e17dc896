version: tuple[int, int, int]
version_string: str
release_date: str
