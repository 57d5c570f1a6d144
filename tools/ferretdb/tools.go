//go:build tools

// Package tools records the FerretDB command as a build dependency.
package tools

import _ "github.com/FerretDB/FerretDB/cmd/ferretdb"
