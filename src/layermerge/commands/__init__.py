"""One module per CLI subcommand: add_parser(subparsers) builds its arguments, run(args) does the work."""
