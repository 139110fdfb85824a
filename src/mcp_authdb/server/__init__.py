"""The MCP server: an OAuth authorization server for MCP clients over PostgreSQL.

Users sign in at an upstream OAuth provider, and every piece of OAuth state
(clients, pending authorizations, authorization codes, grants) is stored in
PostgreSQL, so any replica serves any request. This layer may import ``db``,
``store`` and ``sql``; only the command line imports it.
"""
