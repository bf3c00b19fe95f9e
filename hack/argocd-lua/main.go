// Command argocd-lua runs one Argo CD resource customization script (health.lua, discovery.lua
// or an action.lua) the way Argo CD runs a script from the argocd-cm ConfigMap, and prints what
// the script returned as JSON. tests/e2e/argocd.rs runs every Lua test case through it.
//
//	argocd-lua [-now RFC3339] [-param name=value]... SCRIPT <OBJECT.json
//
// What it reproduces from Argo CD (util/lua in argoproj/argo-cd):
//   - the interpreter: gopher-lua, at the version Argo CD's go.mod requires (go.mod here);
//   - the libraries: only package, base, table and a safe os with time and date; no string,
//     math, io or debug (argocd-cm customizations run so unless useOpenLibs is set, and ours do
//     not set it). `require("os")` returns the same safe os;
//   - the globals: `obj`, the object decoded from JSON (objects become tables with string keys,
//     arrays sequences, numbers Lua numbers, null nil), and `actionParams`, a table of the
//     action's parameters (strings), empty unless -param is given;
//   - the one-second limit on a run;
//   - the result: the value on top of the stack, encoded with layeh.com/gopher-json as Argo CD
//     does (an empty table becomes [], a table with mixed keys is an error). A table is
//     required, as Argo CD requires; nil is printed as null (Argo CD reads it as an empty
//     health).
//
// -now fixes the clock os.time and os.date read (tests use 0001-01-01T00:00:00Z, as Argo CD's
// own expected outputs do); without it they read the real clock.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	lua "github.com/yuin/gopher-lua"
	luajson "layeh.com/gopher-json"
)

// Argo CD cancels a script after this long.
const runLimit = time.Second

type params []string

func (p *params) String() string { return strings.Join(*p, ",") }

func (p *params) Set(v string) error {
	if !strings.Contains(v, "=") {
		return fmt.Errorf("%q is not name=value", v)
	}
	*p = append(*p, v)
	return nil
}

func main() {
	now := flag.String("now", "", "the time os.time and os.date see (RFC 3339); default: the real clock")
	var actionParams params
	flag.Var(&actionParams, "param", "an action parameter name=value (repeatable)")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: argocd-lua [-now RFC3339] [-param name=value]... SCRIPT <OBJECT.json")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	clock := time.Now
	if *now != "" {
		fixed, err := time.Parse(time.RFC3339, *now)
		if err != nil {
			fail("-now: %v", err)
		}
		clock = func() time.Time { return fixed }
	}
	path := flag.Arg(0)
	script, err := os.ReadFile(path)
	if err != nil {
		fail("%v", err)
	}
	var obj any
	if err := json.NewDecoder(os.Stdin).Decode(&obj); err != nil {
		fail("the object on stdin is not JSON: %v", err)
	}
	out, err := run(string(script), obj, actionParams, clock)
	if err != nil {
		fail("%s: %v", path, err)
	}
	os.Stdout.Write(out)
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "argocd-lua: "+format+"\n", args...)
	os.Exit(1)
}

func run(script string, obj any, actionParams []string, clock func() time.Time) ([]byte, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	safeOs := safeOsFuncs(clock)
	openSafeOs := func(l *lua.LState) int {
		l.Push(l.RegisterModule(lua.OsLibName, safeOs))
		return 1
	}
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.OsLibName, openSafeOs},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return nil, fmt.Errorf("opening %s: %w", lib.name, err)
		}
	}
	l.PreloadModule(lua.OsLibName, func(l *lua.LState) int {
		l.Push(l.SetFuncs(l.NewTable(), safeOs))
		return 1
	})

	ctx, cancel := context.WithTimeout(context.Background(), runLimit)
	defer cancel()
	l.SetContext(ctx)

	paramTable := l.CreateTable(0, len(actionParams))
	for _, p := range actionParams {
		name, value, _ := strings.Cut(p, "=")
		paramTable.RawSetH(lua.LString(name), lua.LString(value))
	}
	l.SetGlobal("actionParams", paramTable)
	l.SetGlobal("obj", toLua(l, obj))

	fn, err := l.LoadString(script)
	if err != nil {
		return nil, err
	}
	l.Push(fn)
	if err := l.PCall(0, lua.MultRet, nil); err != nil {
		return nil, err
	}
	result := l.Get(-1)
	switch result.Type() {
	case lua.LTTable:
		return luajson.Encode(result)
	case lua.LTNil:
		return []byte("null"), nil
	default:
		return nil, fmt.Errorf("expect table output from Lua script, not %s", result.Type())
	}
}

// toLua builds the value Argo CD hands a script from a decoded JSON value.
func toLua(l *lua.LState, v any) lua.LValue {
	switch v := v.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []any:
		t := l.CreateTable(len(v), 0)
		for _, item := range v {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]any:
		t := l.CreateTable(0, len(v))
		for key, item := range v {
			t.RawSetH(lua.LString(key), toLua(l, item))
		}
		return t
	default:
		return lua.LNil
	}
}

// safeOsFuncs is the os module Argo CD gives scripts: time and date only, reading clock.
func safeOsFuncs(clock func() time.Time) map[string]lua.LGFunction {
	return map[string]lua.LGFunction{
		"time": func(l *lua.LState) int {
			if l.GetTop() == 0 {
				l.Push(lua.LNumber(clock().Unix()))
				return 1
			}
			fields := l.CheckTable(1)
			field := func(name string, def int) int {
				if n, ok := fields.RawGetString(name).(lua.LNumber); ok {
					return int(n)
				}
				return def
			}
			t := time.Date(field("year", -1), time.Month(field("month", -1)), field("day", -1),
				field("hour", 12), field("min", 0), field("sec", 0), 0, time.Local)
			l.Push(lua.LNumber(t.Unix()))
			return 1
		},
		"date": func(l *lua.LState) int {
			t := clock().In(time.Local)
			format := "%c"
			if l.GetTop() >= 1 {
				format = l.CheckString(1)
				if rest, utc := strings.CutPrefix(format, "!"); utc {
					t = clock().UTC()
					format = rest
				}
				// As in Argo CD, an explicit time is local time even after "!".
				if l.GetTop() >= 2 {
					t = time.Unix(l.CheckInt64(2), 0)
				}
				if strings.HasPrefix(format, "*t") {
					l.Push(dateTable(l, t))
					return 1
				}
			}
			l.Push(lua.LString(strftime(t, format)))
			return 1
		},
	}
}

func dateTable(l *lua.LState, t time.Time) *lua.LTable {
	table := l.NewTable()
	for name, value := range map[string]int{
		"year": t.Year(), "month": int(t.Month()), "day": t.Day(),
		"hour": t.Hour(), "min": t.Minute(), "sec": t.Second(),
		"wday": int(t.Weekday()) + 1, "yday": 0, // Argo CD leaves yday at 0
	} {
		table.RawSetString(name, lua.LNumber(value))
	}
	table.RawSetString("isdst", lua.LFalse)
	return table
}

// The conversions Argo CD's os.date knows, as Go layouts. Its quirks are kept on purpose, since
// a script sees them in Argo CD: %a prints "mon" and %x prints the time, not the date.
var dateLayouts = map[byte]string{
	'a': "mon", 'A': "Monday", 'b': "Jan", 'B': "January", 'c': "02 Jan 06 15:04 MST",
	'd': "02", 'F': "2006-01-02", 'H': "15", 'I': "03", 'm': "01", 'M': "04", 'p': "PM",
	'P': "pm", 'S': "05", 'x': "15/04/05", 'X': "15:04:05", 'y': "06", 'Y': "2006",
	'z': "-0700", 'Z': "MST",
}

// strftime formats t as Argo CD's os.date does: %% is a percent sign, %w the weekday (0 is
// Sunday), the conversions above their layout; any other %c is kept as written (%T, %e, %j...
// print themselves), as is a % that ends the format.
func strftime(t time.Time, format string) string {
	var b strings.Builder
	for i := 0; i < len(format); i++ {
		c := format[i]
		if c != '%' || i == len(format)-1 {
			b.WriteByte(c)
			continue
		}
		i++
		conv := format[i]
		switch layout, known := dateLayouts[conv]; {
		case conv == '%':
			b.WriteByte('%')
		case conv == 'w':
			b.WriteString(strconv.Itoa(int(t.Weekday())))
		case known:
			b.WriteString(t.Format(layout))
		default:
			b.WriteByte('%')
			b.WriteByte(conv)
		}
	}
	return b.String()
}
