from rkdtool.cli import main

main()
