"""The PostgreSQL volume model: one volume served from several hosts through one database
(ARCHITECTURE.md, "PostgreSQL engine (internals)")."""
