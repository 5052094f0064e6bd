from otcbench.cli import main

main()
