from memserve.cli import main

main()
