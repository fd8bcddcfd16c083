package proctest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// Post sends one HTTP/1.1 POST of body on c and checks the answer is 200
// with body echoed (see SplitHTTP). It never retries: a connection cut
// before the whole answer arrived is an error, which net/http's client
// would hide by sending an idempotent request again. closing asks the
// server to close the connection after the answer.
func Post(c net.Conn, br *bufio.Reader, body []byte, closing bool) error {
	_, err := PostTo(c, br, "backend", body, closing)
	return err
}

// PostTo is Post with the request's Host. It returns the response (its
// body already read and checked), so the caller can see its headers and
// whether the server closes the connection after it (resp.Close).
func PostTo(c net.Conn, br *bufio.Reader, host string, body []byte, closing bool) (*http.Response, error) {
	conn := ""
	if closing {
		conn = "Connection: close\r\n"
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n%s\r\n%s", host, len(body), conn, body); err != nil {
		return nil, fmt.Errorf("writing request: %w", err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return nil, fmt.Errorf("reading response: %w", err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return resp, fmt.Errorf("response %d, %d of %d bytes: %w", resp.StatusCode, len(got), len(body), err)
	}
	if resp.StatusCode != http.StatusOK || !bytes.Equal(got, body) {
		return resp, fmt.Errorf("response %d, %d of %d bytes, want 200 and the body echoed", resp.StatusCode, len(got), len(body))
	}
	return resp, nil
}

// SplitHTTP answers HTTP/1.1 POSTs on c, echoing the body: status line and
// headers in one write, a pause of 1-50ms, the body in another — so a proxy
// that cuts a connection between a response's writes is caught. It returns
// when the client closes, asks to close, or an error occurs.
func SplitHTTP(c *net.TCPConn, br *bufio.Reader) { SplitHTTPAs(c, br, "") }

// SplitHTTPAs is SplitHTTP whose responses carry X-Backend: name (when name
// is not empty), so a test can tell which backend answered.
func SplitHTTPAs(c *net.TCPConn, br *bufio.Reader, name string) {
	extra := ""
	if name != "" {
		extra = "X-Backend: " + name + "\r\n"
	}
	for i := 0; ; i++ {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		body, err := io.ReadAll(req.Body)
		if err != nil {
			return
		}
		closing := req.Close
		conn := ""
		if closing {
			conn = "Connection: close\r\n"
		}
		if _, err := fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s%s\r\n", len(body), extra, conn); err != nil {
			return
		}
		time.Sleep(time.Duration(1+(i*7)%50) * time.Millisecond)
		if _, err := c.Write(body); err != nil || closing {
			return
		}
	}
}
