from memory3.cli import main

main()
