"""The hostile-input tier: seeded garbage, wrong types, fd abuse and more,
as uid 65534 and as root, against luod on the fake kernel."""
