package server

// SetAfterAccept installs a hook the accept loop calls between accept(2)
// and counting the connection (tests widen that window to check the drain).
func SetAfterAccept(s *Server, f func()) { s.afterAccept.Store(&f) }
