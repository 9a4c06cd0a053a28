"""What the tests run and lean on, apart from the tests themselves.

live_app, relay_app, secure_app  apps that the integration tests serve with gunicorn
upstream          a loopback server speaking the providers' wire formats (for their SDKs)
sse_parser        an SSE parser and the contract's turn rule, written from the specs
redis_topologies  Redis Cluster and Sentinel started for a test, and shared checks
redis_busy, redis_fencing, redis_lost_reply  programs that put Redis in a fault
janitor           stops what a test session left running
node/             the Node programs (the AI SDK, the eventsource package, our ES module)
"""
