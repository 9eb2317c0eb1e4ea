package idemecho_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/labstack/echo/v4"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/idemecho"
)

// A handler that returns an error: the error is rendered inside the
// middleware, so the 404 the client got is the one stored and replayed.
func ExampleNew() {
	e := echo.New()
	e.Use(func(next echo.HandlerFunc) echo.HandlerFunc { // authentication
		return func(c echo.Context) error {
			c.Set("user", c.Request().Header.Get("X-User"))
			return next(c)
		}
	})
	e.Use(idemecho.New(idempotency.Config{RequireKey: true},
		idemecho.WithKeyScope(func(c echo.Context) string { return c.Get("user").(string) })))

	lookups := 0
	e.POST("/refunds", func(c echo.Context) error {
		lookups++
		return echo.NewHTTPError(http.StatusNotFound, "no such payment")
	})

	for range 2 {
		req := httptest.NewRequest(http.MethodPost, "/refunds", strings.NewReader(`{"payment":"pay_9"}`))
		req.Header.Set("X-User", "alice")
		req.Header.Set("Idempotency-Key", "1f0c2b5e-7a8d-4c3e-9b2a-0d4e5f6a7b8c")
		w := httptest.NewRecorder()
		e.ServeHTTP(w, req)
		fmt.Println(w.Code, strings.TrimSpace(w.Body.String()), "replayed:", w.Header().Get(idempotency.ReplayedHeader) == "true")
	}
	fmt.Println("lookups:", lookups)
	// Output:
	// 404 {"message":"no such payment"} replayed: false
	// 404 {"message":"no such payment"} replayed: true
	// lookups: 1
}
