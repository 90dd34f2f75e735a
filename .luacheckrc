std = "lua54"
max_line_length = 110
exclude_files = { "build/", "xmppsm/", ".git/" }
files["spec/"] = { std = "+busted" }
