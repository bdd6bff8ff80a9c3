from threatgate.cli import main

main()
