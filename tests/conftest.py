pytest_plugins = ["tests.fixtures_tiny", "tests.fixtures_s3", "tests.fixtures_serve", "tests.fixtures_redis"]
