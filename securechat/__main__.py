from securechat.cli import main

main()
