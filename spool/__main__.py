from spool.cli import main

main()
