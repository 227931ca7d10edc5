from histolite.cli import main

main()
