from examples.reproduce.run import main

main()
