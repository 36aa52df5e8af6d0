"""Local Fly: an emulator of the Machines API, Fly Proxy, and Machines as local processes."""
