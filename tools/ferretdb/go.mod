// Pins FerretDB v1 (embedded SQLite backend) so that `go build` fetches it from the Go module proxy.
module chatbus/tools/ferretdb

go 1.22

require github.com/FerretDB/FerretDB v1.24.0
