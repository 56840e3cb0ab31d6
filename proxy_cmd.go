package main

import (
	"fmt"
	"os"
)

// runProxy runs the dataplane alone from a file of rules. The dataplane lands
// with its own issue; until then the subcommand says so and fails.
func runProxy(args []string) int {
	fmt.Fprintln(os.Stderr, "stickylb proxy: the standalone dataplane is not built yet")
	return 2
}
