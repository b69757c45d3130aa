"""Native sources of the extension, shipped as package data; built on first use by nla_fast.extension."""
