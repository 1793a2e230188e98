from securefpt.cli import main

main()
